"""`--proxy-mode nftables`: the kernel data plane in one nftables table per family."""
