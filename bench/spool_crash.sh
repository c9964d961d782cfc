#!/bin/sh
# The spool's crash test at length (docs/fault-suite.md, "The spool under SIGKILL"):
# the CI run kills the relay 100 times on the file spool and 30 on RabbitMQ; this one
# 1,000 and 200 by default.  Run from the repository root, in the test environment
# (tox's, or a venv with the project and the test tools installed):
#
#     sh bench/spool_crash.sh [FILE_KILLS] [AMQP_KILLS]
#
# ESMTPFA_CRASH_SEED=N repeats one run's random choices.
set -eu
ESMTPFA_CRASH_KILLS="${1:-1000}" ESMTPFA_CRASH_AMQP_KILLS="${2:-200}" \
    exec python3 -m twisted.trial tests.faults.test_spool_crash
