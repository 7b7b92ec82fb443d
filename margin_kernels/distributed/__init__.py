"""Model parallel margin heads on torch.distributed: classes sharded over ranks, Partial FC sampling,
checkpoints that reshard. Importing this package needs no initialised process group."""
from .checkpoint import check_buffers_consistent, load_sharded, reshard_state_dicts, save_sharded
from .comm import CollectiveError
from .head import DistributedMarginHead
from ..sampling import PartialFCSampler, num_sampled
from .sharding import max_shard_size, shard_range, shard_ranges, shard_size

__all__ = [
    "CollectiveError", "DistributedMarginHead", "PartialFCSampler", "check_buffers_consistent", "load_sharded", "max_shard_size",
    "num_sampled", "reshard_state_dicts", "save_sharded", "shard_range", "shard_ranges", "shard_size",
]
