"""Programs around the network and the trainer (export, ...): they may import any package; none imports them."""
