"""The batch lane: OpenAI Batch API jobs (runner), their durable files (store), and the
same work as an offline Ray Data job (job)."""
