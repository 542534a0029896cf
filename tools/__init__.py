"""Programs around the network and the trainer (planner, export, ...): they may import any package; none
imports them."""
