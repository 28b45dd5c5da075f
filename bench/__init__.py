"""Side-by-side benchmarks of kojin_pg against Redis, Celery's db+ backend and kombu's sqla."""
