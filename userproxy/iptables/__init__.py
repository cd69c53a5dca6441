"""Everything both proxy modes need to program iptables, and nothing mode-specific.

  rule.py       rules as data (`Rule`, `Target`, `Jump`, `Ruleset`), diffs and jump plans (pure)
  text.py       iptables-restore batches out, iptables-save dumps in (pure)
  interface.py  `Iptables`: save, list, restore (with a test pass), per variant and family
  exec.py       the real one: the iptables binaries (legacy or nft)
  iptc.py       the real one on python-iptables (libiptc, legacy only)
  chains.py     `ChainSync`: keeps a fixed set of chains and their jumps equal to a ruleset
  writer.py     `RuleWriter`: the one thread every kernel write runs on; full vs partial syncs
  detect.py     which variant the host uses; lock.py the xtables lock; cleanup.py removal

A fake `Iptables` that parses what it is given lives in `userproxy.testing.fakes`.
"""
