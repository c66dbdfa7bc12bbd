"""mmengine runs resume on torch >= 2.6 with weights_only=True once mmdat is imported."""
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import mmdat  # noqa: F401  (registers the allow-list)
from mmdat.engine import allow_mmengine_checkpoints


class TinyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, mode='loss'):
        return {'loss': self.linear(torch.stack(inputs)).square().mean()}


class RandomData(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return dict(inputs=torch.randn(4, generator=torch.Generator().manual_seed(index)))


class Killed(Exception):
    pass


class KillAfterFirstEpoch(Hook):
    """Ends the run abruptly once the first epoch's checkpoint is written."""
    priority = 'LOWEST'  # after CheckpointHook

    def after_train_epoch(self, runner):
        raise Killed


def make_runner(work_dir, max_epochs, resume=False, custom_hooks=(), load_from=None):
    return Runner(
        model=TinyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=RandomData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        param_scheduler=[dict(type='MultiStepLR', milestones=[1], gamma=0.5, by_epoch=True)],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        custom_hooks=list(custom_hooks),
        resume=resume,
        load_from=load_from,
        randomness=dict(seed=0))


def test_checkpoint_loads_with_weights_only(tmp_path):
    runner = make_runner(tmp_path, max_epochs=1)
    runner.train()
    checkpoint = torch.load(tmp_path / 'epoch_1.pth', weights_only=True)
    assert checkpoint['meta']['iter'] == 4
    assert checkpoint['message_hub']['log_scalars']['train/loss'].current() > 0


def test_resume_continues_with_optimizer_and_scheduler_state(tmp_path):
    with pytest.raises(Killed):
        make_runner(tmp_path, max_epochs=2, custom_hooks=[KillAfterFirstEpoch()]).train()
    saved = torch.load(tmp_path / 'epoch_1.pth', weights_only=True)
    assert not (tmp_path / 'epoch_2.pth').exists()
    runner = make_runner(tmp_path, max_epochs=2, resume=True)
    runner.train()
    assert runner.iter == 8 and runner.epoch == 2
    # the optimizer went on from the saved moments: the step count is cumulative
    state = runner.optim_wrapper.optimizer.state_dict()['state'][0]
    assert state['step'].item() == saved['optimizer']['state'][0]['step'].item() + 4 == 8
    # and ends exactly where an uninterrupted run ends
    straight = make_runner(tmp_path / 'straight', max_epochs=2)
    straight.train()
    assert runner.optim_wrapper.get_lr() == straight.optim_wrapper.get_lr()
    for a, b in zip(runner.model.parameters(), straight.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_functions_are_still_refused(tmp_path):
    allow_mmengine_checkpoints()
    torch.save({'f': print}, tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / 'evil.pth', weights_only=True)
