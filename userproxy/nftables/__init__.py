"""nftables: transactions of objects (pure), the `nft` binary behind a small interface."""
