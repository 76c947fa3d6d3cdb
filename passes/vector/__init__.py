"""Methods that train vectors only: IA³ (scales of activations), VeRA (scales around frozen
random projections), PVeRA (VeRA with its intermediate sampled), DVoRA (VeRA's update under
DoRA's magnitude and direction), BEFT and BitFit (biases), LN tuning (the norms' weights and
biases), trainable tokens (chosen rows of an embedding)."""
