"""CustomContrast model package (DESIGN.md section 2).

config (typed params, no heavy imports) -> architectures, backbones (frozen SD1.5 parts) ->
perceiver, mfi (MFI encoder) -> attention (decoupled cross-attention processor), splus (S+ text
injection) -> losses -> model (the one model object) -> checkpoint (trainable weights only).
Importing this package imports nothing heavy: flows/config/params.py reads cc_model.config.
"""
