"""Installing and checking an install: model manifests and assembly (`hera models`), the llama.cpp
build flags for this CPU, and the self-test (`hera doctor`)."""
