"""Planning: device profiles and fleets, cost model, plans, the planner and the simulator."""
