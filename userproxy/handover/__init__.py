"""Restarts nobody notices: a new `userproxy run` takes the running one's listening sockets.

The running process (the *giver*) listens on a UNIX socket beside its instance lock
(`/run/userproxy/netns-<inode>.handover`). A new process that finds the lock held connects
there instead of giving up (the *taker*):

    taker                                   giver
      hello {versions, pid, mode}   ->
                                    <-      welcome {version, pid}   (or refuse {reason})
                                            the giver stops writing rules (its sync pauses)
                                    <-      sockets {keys} + SCM_RIGHTS, in chunks
                                    <-      end
      adopts the sockets, first sync
      (same proxy ports: the rules it
      writes are the ones in place)
      serving                        ->
                                            stops accepting, closes its servers
                                    <-      released
                                            drains its relays, exits, rules left in place

The sockets (proxy ports, NodePort claims, the health and metrics servers, and the instance
lock itself) are the same kernel objects in both processes, so connections that arrive during
the switch wait in the listen backlog; nothing is refused. If the taker goes away before
`serving`, the giver resumes as if nothing happened. A giver that speaks none of the taker's
versions refuses, leaves its rules and exits, and the taker cold-starts on the ports recorded
in the journal (`journal.py`), which is also what a restart after a crash uses.
"""
