"""Portals: the kernel rules (KUBE-PORTALS-*, KUBE-NODEPORT-*) that send ClusterIP, external,
load-balancer and NodePort traffic to the userspace mode's proxy ports, and the NodePort
claims that keep those ports ours. `manager.PortalManager` implements `interface.Portals`."""
