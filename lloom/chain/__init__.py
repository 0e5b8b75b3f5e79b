"""On-chain accounting: the Accounting contract, client-signed receipts, settlement."""
