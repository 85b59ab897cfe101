#!/usr/bin/env bash
# Remake the committed demo figures: train SGD and SAM on digits with 20% label noise over
# 3 seeds (same budget), compare the two groups, and copy the figures and the report here.
# Usage, from anywhere: bash figures/make_figures.sh   (a few minutes on 2 CPU cores)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
sharpscope demo --out runs/demo --overwrite
mkdir -p figures/demo
for name in interpolation 1d 1d_band 2d_contour 2d_surface3d rho eigenvalues density training; do
  for ext in png pdf; do
    cp "runs/demo/compare/$name.$ext" "figures/demo/$name.$ext"
  done
done
cp runs/demo/compare/report.md figures/demo/report.md
