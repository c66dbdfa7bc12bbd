# The demo detector (configs/demo/retinanet_dat_demo_shapes.py) on the tests' few generated
# images: batch 2, two epochs, a checkpoint per epoch, so the tools run end to end in seconds.
_base_ = '../../../configs/demo/retinanet_dat_demo_shapes.py'

max_epochs = 2

train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=2)
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [dict(type='MultiStepLR', by_epoch=True, milestones=[1], gamma=0.5)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=-1))
