"""The sinks of a sweep's rows (`base.Sink`): the Parquet store first (`store`, the record of
truth), then the report (`report`) and W&B (`wandb`) as guarded peers."""
