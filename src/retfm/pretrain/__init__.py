"""Self-supervised pretraining: objectives (``nn.Module``s that map a batch of images to a dict of losses) and the
trainer that runs them.

- :class:`retfm.pretrain.mae.MAE`: masked autoencoder, as RETFound (Zhou et al., Nature 2023) pretrains.
- :class:`retfm.pretrain.token_reconstruction.TokenReconstruction`: as RETFound-Green (Engelmann et al. 2024).

Each objective holds the timm backbone as ``objective.backbone``, unchanged in structure, so that its state dict
saves as a plain registry backbone when training ends.
"""
