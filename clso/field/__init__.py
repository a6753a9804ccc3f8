"""The neuron-field LM of the crystal journal (document 004): the model, and its training with growth and freezing."""
