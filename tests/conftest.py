"""Test-session setup that must happen before mmdat is imported, and shared fixtures."""
import os

import pytest
import torch


def _write_hostile_checkpoints(folder):
    """Checkpoint files that run ``touch MARKER`` when unpickled without restrictions, in each
    format torch reads (zip, legacy non-zip, a raw pickle), and broken files."""
    import pickle

    marker = folder / 'PAYLOAD_RAN'

    class Payload:

        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    state = {'state_dict': {'backbone.patch_embed.conv.weight': torch.zeros(1)}, 'x': Payload()}
    hostile = {'raw_pickle': folder / 'raw_pickle.pth', 'legacy': folder / 'legacy.pth',
               'zip': folder / 'zip.pth'}
    hostile['raw_pickle'].write_bytes(pickle.dumps(Payload()))
    torch.save(state, hostile['legacy'], _use_new_zipfile_serialization=False)
    torch.save(state, hostile['zip'])
    good = folder / 'good.pth'
    torch.save({'state_dict': {'w': torch.zeros(4)}}, good)
    broken = {'empty': folder / 'empty.pth', 'text': folder / 'text.pth',
              'truncated_zip': folder / 'truncated_zip.pth',
              'truncated_legacy': folder / 'truncated_legacy.pth'}
    broken['empty'].write_bytes(b'')
    broken['text'].write_text('not a checkpoint\n')
    broken['truncated_zip'].write_bytes(good.read_bytes()[:200])
    torch.save({'w': torch.zeros(4)}, folder / 'legacy_good.pth', _use_new_zipfile_serialization=False)
    broken['truncated_legacy'].write_bytes((folder / 'legacy_good.pth').read_bytes()[:60])
    return hostile, broken, marker


@pytest.fixture(scope='session')
def hostile_checkpoints(tmp_path_factory):
    """``(hostile, broken, marker)``: dicts of kind -> path and the file a payload would create."""
    return _write_hostile_checkpoints(tmp_path_factory.mktemp('hostile'))
