"""`--proxy-mode iptables`: kube-proxy's iptables-mode rules, written by userproxy; the kernel
carries the traffic. `provider.IptablesProvider` is the mode's `Provider`, `rules.py` the pure
rule builder, `setup.make_provider` builds it from the settings."""
