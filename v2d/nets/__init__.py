"""Network building blocks: residual blocks, 2D/3D hourglasses, encoders, flow U-Net."""
