"""Methods that train vectors only: IA³ (scales of activations), VeRA (scales around frozen
random projections) and DVoRA (VeRA's update under DoRA's magnitude and direction)."""
