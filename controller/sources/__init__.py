"""Route sources: each publishes complete snapshots of the services it knows."""
