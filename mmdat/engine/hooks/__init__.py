from .atomic_checkpoint_hook import AtomicCheckpointHook, AtomicLocalBackend, write_atomically

__all__ = ['AtomicCheckpointHook', 'AtomicLocalBackend', 'write_atomically']
