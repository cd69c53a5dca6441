"""The userspace proxy mode: a listener per service port on a local proxy port, relays to the
endpoints the balancer picks, and portals (kernel rules) that send service traffic there.

`proxier.Proxier` is the mode's `Provider`; `setup.make_provider` builds it from the settings
with its portals and worker processes. Relays: `tcp.py` (raw sockets on the process's own
edge-triggered epoll, `eventcore.py`, with a splice(2) hand-over in `splice.py` for bulk flows)
and `udp.py` (per-client flows, on the same core).
"""
