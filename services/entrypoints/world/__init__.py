"""Commands that regenerate the embedded world's committed weights (base model, recogniser, preference model) and
judge a backbone on it; README.md in flowbp_core/world gives the order. The parts are flowbp_core.world's."""
