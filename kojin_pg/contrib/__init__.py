"""Optional integrations of kojin_pg with other frameworks."""
