"""Methods that rotate or rescale the base weight instead of adding to it (W' = W R): OFT, BOFT,
HRA, RoAd, PSOFT, OSF."""
