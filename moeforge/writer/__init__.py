"""Streaming sharded safetensors output, written into a temporary directory and renamed into place."""
from moeforge.writer.output_dir import atomic_output_dir
from moeforge.writer.safetensors_stream import ShardedWriteResult, split_shards, write_file, write_sharded

__all__ = ["atomic_output_dir", "split_shards", "write_file", "write_sharded", "ShardedWriteResult"]
