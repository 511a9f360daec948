"""Training rules over tensors, with no I/O: PSL, GAPSL (LGI + GDA), SFL, EPSL and the ceiling."""
