"""Where the bytes come from: storage (local or s3, retried), the listing of inputs, one reader per input
format (image folders, tar and Parquet shards, huge TIFFs window by window) and the decode to arrays.
A new input format belongs here."""
