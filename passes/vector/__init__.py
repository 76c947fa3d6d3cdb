"""Methods that train vectors only: IA³ (scales of activations) and VeRA (scales around frozen
random projections)."""
