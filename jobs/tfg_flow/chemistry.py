"""Chemistry checks of generated molecules with RDKit: bonds from coordinates, validity,
uniqueness, novelty, atom and molecule stability, SMILES and SDF.

Bonds come from `rdDetermineBonds`: connectivity from covalent radii; with explicit hydrogens the
bond orders too (`DetermineBondOrders`, neutral molecule). Heavy-atom-only molecules (the TFG-Flow
setting) keep single bonds and let RDKit add implicit hydrogens, so there an atom is stable when its
bond count does not exceed its valence. Valid: RDKit sanitizes it and it is one connected fragment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VALENCE = {1: 1, 6: 4, 7: 3, 8: 2, 9: 1}
SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


@dataclass
class Checked:
    mol: object | None  # an RDKit Mol with a conformer (None when bonds could not be built)
    smiles: str | None  # canonical SMILES when valid
    valid: bool
    stable_atoms: int
    atoms: int

    @property
    def stable(self) -> bool:
        return self.atoms > 0 and self.stable_atoms == self.atoms


def build_molecule(numbers: np.ndarray, positions: np.ndarray):
    """An RDKit molecule with bonds perceived from 3-D coordinates (None if RDKit gives up)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")  # invalid samples are counted, not printed one by one

    lines = [str(len(numbers)), ""] + [f"{SYMBOL[int(z)]} {p[0]:.5f} {p[1]:.5f} {p[2]:.5f}"
                                       for z, p in zip(numbers, positions)]
    mol = Chem.MolFromXYZBlock("\n".join(lines) + "\n")
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineConnectivity(mol, useHueckel=False)
        if 1 in set(int(z) for z in numbers):
            rdDetermineBonds.DetermineBondOrders(mol, charge=0)
        else:  # heavy atoms only: single bonds; hydrogens become implicit when sanitizing
            for atom in mol.GetAtoms():
                atom.SetNoImplicit(False)
    except Exception:  # RDKit raises plain ValueError/RuntimeError for impossible valences
        return None
    return mol


def check_molecule(numbers: np.ndarray, positions: np.ndarray) -> Checked:
    from rdkit import Chem

    mol = build_molecule(numbers, positions)
    atoms = len(numbers)
    if mol is None:
        return Checked(None, None, False, 0, atoms)
    explicit_h = 1 in set(int(z) for z in numbers)
    stable = 0
    for atom in mol.GetAtoms():
        order = sum(b.GetBondTypeAsDouble() for b in atom.GetBonds())
        allowed = VALENCE[atom.GetAtomicNum()]
        stable += int(order == allowed) if explicit_h else int(order <= allowed)
    try:
        copy = Chem.Mol(mol)
        Chem.SanitizeMol(copy)
        one_piece = len(Chem.GetMolFrags(copy)) == 1
    except Exception:  # sanitization failures are RDKit's verdict "not a molecule"
        return Checked(mol, None, False, stable, atoms)
    smiles = Chem.MolToSmiles(Chem.RemoveHs(copy)) if one_piece else None
    return Checked(copy, smiles, one_piece, stable, atoms)


def reference_smiles(molecules: list[tuple[np.ndarray, np.ndarray]]) -> set[str]:
    """SMILES of training molecules built the same way as generated ones (from their coordinates),
    so novelty compares like with like."""
    return {c.smiles for c in (check_molecule(z, p) for z, p in molecules) if c.smiles}


def chemistry_metrics(checked: list[Checked], reference: set[str] | None = None) -> dict[str, float]:
    n = max(len(checked), 1)
    valid = [c.smiles for c in checked if c.valid]
    unique = set(valid)
    out = {
        "validity": len(valid) / n,
        "uniqueness": len(unique) / max(len(valid), 1),
        "atom_stability": sum(c.stable_atoms for c in checked) / max(sum(c.atoms for c in checked), 1),
        "molecule_stability": sum(c.stable for c in checked) / n,
    }
    if reference is not None:
        out["novelty"] = len(unique - reference) / max(len(unique), 1)
    return out


def write_sdf(path: Path, checked: list[Checked], properties: list[dict[str, float]]) -> None:
    """Every molecule that has bonds (valid or not, flagged by a `valid` field) into one SDF file."""
    from rdkit import Chem

    with Chem.SDWriter(str(path)) as writer:
        for i, (c, props) in enumerate(zip(checked, properties)):
            if c.mol is None:
                continue
            mol = Chem.Mol(c.mol)
            mol.SetProp("_Name", f"sample_{i}")
            mol.SetProp("valid", str(int(c.valid)))
            mol.SetProp("smiles", c.smiles or "")
            for key, value in props.items():
                mol.SetProp(key, f"{value:.6g}")
            writer.write(mol)
