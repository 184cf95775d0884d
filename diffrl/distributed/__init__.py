"""Scale-out on Ray: rollout workers and reward actors (`ray_workers`). Importing it does not import Ray."""
