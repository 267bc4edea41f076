FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cloudq ./cloudq
COPY workers ./workers
COPY client ./client
RUN pip install --no-cache-dir .
CMD ["cloudq", "--help"]
