#!/usr/bin/env bash
# Post `pcam report`'s Markdown on a pull request as one comment, edited (not duplicated) on later
# pushes. Uses the GitHub CLI's REST calls (`gh api`) and jq, both on GitHub's runners.
#
#   scripts/pr-comment.sh [REPORT]      (default reports/compare/report.md)
#
# Needs GH_TOKEN (the workflow's token, pull-requests: write), GITHUB_REPOSITORY (owner/name, set
# by Actions) and PCAM_PR_NUMBER; PCAM_REPORT_URL, if set, is linked as where the plot images are
# (the workflow run's artifact: a comment cannot embed the images the report links to).
# The comment is the one whose body starts with the marker line (PCAM_COMMENT_MARKER, default
# `<!-- pcam-report -->`; the data workflow's is `<!-- pcam-data -->`, a comment of its own) and
# that GitHub Actions wrote (PCAM_COMMENT_AUTHOR, default github-actions[bot]); without one, it is
# created.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MARKER=${PCAM_COMMENT_MARKER:-'<!-- pcam-report -->'}
[[ $MARKER =~ ^\<!--\ [a-z0-9-]+\ --\>$ ]] ||
    die "PCAM_COMMENT_MARKER '$MARKER' is not a marker like '<!-- pcam-data -->'."
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
report=${1:-reports/compare/report.md}
[[ -f $report ]] || die "$report not found: run \`pcam report BASE\` (make pr-report) first."
[[ -n ${GITHUB_REPOSITORY:-} ]] || die "GITHUB_REPOSITORY (owner/name) is not set."
[[ ${PCAM_PR_NUMBER:-} =~ ^[0-9]+$ ]] || die "PCAM_PR_NUMBER '${PCAM_PR_NUMBER:-}' is not a pull request number."
command -v gh >/dev/null || die "gh (the GitHub CLI) is not on PATH."
command -v jq >/dev/null || die "jq is not on PATH."
author=${PCAM_COMMENT_AUTHOR:-github-actions[bot]}
issue="repos/$GITHUB_REPOSITORY/issues/$PCAM_PR_NUMBER"

body=$(mktemp)
trap 'rm -f "$body"' EXIT
{
    echo "$MARKER"
    # An image line becomes its title: the images are in the run's artifact, not on GitHub.
    sed -E 's/^!\[([^]]*)\]\([^)]*\)$/*(plot: \1)*/' "$report"
    if [[ -n ${PCAM_REPORT_URL:-} ]]; then
        printf '\nThe plots as images: %s (reports/compare/ of this run).\n' "$PCAM_REPORT_URL"
    fi
} >"$body"

# --paginate prints one JSON array per page: jq reads them all.
existing=$(gh api --paginate "$issue/comments" |
    jq -r --arg marker "$MARKER" --arg author "$author" \
        '.[] | select(.user.login == $author and (.body | startswith($marker))) | .id' |
    head -n 1)
if [[ -n $existing ]]; then
    gh api --method PATCH "repos/$GITHUB_REPOSITORY/issues/comments/$existing" -F "body=@$body" >/dev/null
    log "updated comment $existing on $GITHUB_REPOSITORY#$PCAM_PR_NUMBER"
else
    gh api --method POST "$issue/comments" -F "body=@$body" >/dev/null
    log "created the report comment on $GITHUB_REPOSITORY#$PCAM_PR_NUMBER"
fi
