"""The sparse side: embedding tables from the config (``tables``) and their sharding (``sharding``:
planner, DistributedModelParallel, fused optimizer); ``options`` lists what each device supports."""
