"""Methods that train a sparse weight update on a fixed set of entries: SHiRA (a sparse update on
a fixed mask) and Super-Tuning (chosen entries, with an optional low-rank part)."""
