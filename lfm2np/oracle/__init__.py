"""The oracle for other backends: named traces, compare, golden vectors, tolerances, and the diagnosis of
a backend from its dumps (the catalogue of porting mistakes)."""
