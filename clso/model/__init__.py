"""The GPT-2s compared: the crystalline one under search, the dense AdamW baseline, their FLOP counts
and the best loss a frozen head allows. (The neuron-field LM is clso.field.)"""
