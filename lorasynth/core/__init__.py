"""Layer 1, core: the LoRA object and its linear algebra, the SD1.5 module table, the flattened
Layout, ΔW geometry (inner products, cosines, energy scores), exact blending, and the safe file
primitives (validated reads, strict JSON, atomic writes). Imports nothing above itself."""
