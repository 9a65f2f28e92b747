"""Reading, generating and converting training data (Parquet)."""
