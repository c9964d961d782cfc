# esmtpfa's container image (README, "Container image").
#
# Two stages: the builder installs esmtpfa and its dependencies (all published as
# wheels, so nothing is compiled) into a virtualenv; the final image holds that
# virtualenv on a clean python:3.11-slim, with no pip cache, no build tools and no
# source tree, and runs as an unprivileged user.  tests/test_deploy.py runs the
# builder's RUN steps in a fresh virtualenv, then the entry point.

FROM python:3.11-slim AS builder

ENV VENV=/opt/esmtpfa \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY esmtpfa ./esmtpfa
COPY twisted ./twisted
# The last step proves `twistd esmtpfa` is installed, and makes Twisted write its plugin
# cache now: in the final image the virtualenv is read-only.
RUN python -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-cache-dir . \
    && "$VENV/bin/twistd" esmtpfa --help > /dev/null


FROM python:3.11-slim

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it
# (deploy/deployment.yaml uses the same numbers).
RUN groupadd --system --gid 10001 esmtpfa \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/esmtpfa \
        --no-create-home --shell /usr/sbin/nologin esmtpfa \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/esmtpfa \
    && install -d -m 0755 /etc/esmtpfa/providers /etc/esmtpfa/tls

COPY --from=builder /opt/esmtpfa /opt/esmtpfa

ENV PATH=/opt/esmtpfa/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The Maildir (without an upstream) lands here; mount a volume (or an emptyDir).
WORKDIR /var/lib/esmtpfa
USER 10001:10001

# Unprivileged ports (.env-sample): plain SMTP, implicit TLS, HTTP API, metrics.
EXPOSE 10025 10465 8080 9090

# Settings come from the environment (.env-sample); extra flags can follow the image
# name in `docker run`.  `-n`: stay in the foreground and log to stdout.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "esmtpfa"]
