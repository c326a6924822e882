"""Recovery: training after pruning that keeps the masks (LoRA, distillation). The axis exists; its parts are
issue 15's work, and ``prunewise parts`` lists it as empty until then."""
