# An unchanged mmseg UperNet config with the DAT backbone swapped in, as a user would write it.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group; BN runs anywhere

model = dict(
    pretrained=None,  # the base's ResNet weights; DAT loads its own through init_cfg
    backbone=dict(_delete_=True, type='DAT', arch='tiny', drop_path_rate=0.1),
    decode_head=dict(in_channels=[96, 192, 384, 768], norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=384, norm_cfg=norm_cfg))
