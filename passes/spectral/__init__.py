"""Methods that learn a weight update in a transformed domain: FourierFT (sparse 2-D Fourier
coefficients), WaveFT (sparse 2-D wavelet coefficients), C3A (circular convolution kernels, a
block-circulant update)."""
