# One image for the four services; docker-compose.yml picks the service with `profiles serve NAME`.
FROM python:3.11-slim
WORKDIR /app
# The embedded PostgreSQL refuses to run as root; the services never need root either.
RUN useradd --create-home --uid 10001 profiles
COPY constraints.txt pyproject.toml README.md ./
COPY protos ./protos
COPY profiles ./profiles
COPY profiles_cli ./profiles_cli
COPY shared ./shared
COPY services ./services
COPY bench ./bench
RUN pip install --no-cache-dir -c constraints.txt .
USER profiles
ENV PROFILES_BIND_ADDRESS=0.0.0.0
EXPOSE 50051 50052 50053 50054 9451 9452 9453 9454
ENTRYPOINT ["profiles"]
