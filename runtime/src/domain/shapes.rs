//! The procedural domain's object categories: each a name, a one-line definition (so DiverGen's
//! prompt template applies) and an outline in unit coordinates (`[-1, 1]²`, y down), possibly
//! several polygons whose union is the object. Frequencies follow LVIS's long tail.

use divergen_protocol::Frequency;

pub struct Shape {
    pub name: &'static str,
    pub def: &'static str,
    pub frequency: Frequency,
    pub outline: fn() -> Outline,
}

pub type Polygon = Vec<(f64, f64)>;

/// The object: the union of `solids` minus the union of `holes`.
#[derive(Clone, Debug, Default)]
pub struct Outline {
    pub solids: Vec<Polygon>,
    pub holes: Vec<Polygon>,
}

fn solid(polys: Vec<Polygon>) -> Outline {
    Outline {
        solids: polys,
        holes: Vec::new(),
    }
}

fn regular(n: usize, r: f64, phase: f64) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let a = phase + i as f64 * std::f64::consts::TAU / n as f64;
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

fn star(points: usize, outer: f64, inner: f64) -> Vec<(f64, f64)> {
    (0..2 * points)
        .map(|i| {
            let r = if i % 2 == 0 { outer } else { inner };
            let a = -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / points as f64;
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

fn ellipse(cx: f64, cy: f64, rx: f64, ry: f64, n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let a = i as f64 * std::f64::consts::TAU / n as f64;
            (cx + rx * a.cos(), cy + ry * a.sin())
        })
        .collect()
}

fn rect(x0: f64, y0: f64, x1: f64, y1: f64) -> Vec<(f64, f64)> {
    vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
}

pub const SHAPES: [Shape; 18] = [
    Shape {
        name: "disc",
        def: "a flat round plate with a smooth rim",
        frequency: Frequency::Frequent,
        outline: || solid(vec![ellipse(0.0, 0.0, 0.9, 0.9, 48)]),
    },
    Shape {
        name: "square_tile",
        def: "a flat square tile with straight edges",
        frequency: Frequency::Frequent,
        outline: || solid(vec![rect(-0.8, -0.8, 0.8, 0.8)]),
    },
    Shape {
        name: "triangle_sign",
        def: "a triangular warning sign standing on one edge",
        frequency: Frequency::Frequent,
        outline: || solid(vec![vec![(0.0, -0.9), (0.9, 0.75), (-0.9, 0.75)]]),
    },
    Shape {
        name: "star",
        def: "a five-pointed star shape",
        frequency: Frequency::Frequent,
        outline: || solid(vec![star(5, 0.95, 0.4)]),
    },
    Shape {
        name: "cross",
        def: "a plus-shaped cross with four equal arms",
        frequency: Frequency::Frequent,
        outline: || solid(vec![rect(-0.3, -0.9, 0.3, 0.9), rect(-0.9, -0.3, 0.9, 0.3)]),
    },
    Shape {
        name: "hexagon_nut",
        def: "a six-sided metal nut with a round hole",
        frequency: Frequency::Frequent,
        outline: || Outline {
            solids: vec![regular(6, 0.9, 0.0)],
            holes: vec![ellipse(0.0, 0.0, 0.38, 0.38, 24)],
        },
    },
    Shape {
        name: "ring",
        def: "a round band with a large hole in the middle",
        frequency: Frequency::Common,
        outline: || Outline {
            solids: vec![ellipse(0.0, 0.0, 0.9, 0.9, 48)],
            holes: vec![ellipse(0.0, 0.0, 0.55, 0.55, 40)],
        },
    },
    Shape {
        name: "arrow",
        def: "an arrow pointing to one side",
        frequency: Frequency::Common,
        outline: || {
            solid(vec![vec![
                (-0.9, -0.25),
                (0.2, -0.25),
                (0.2, -0.7),
                (0.95, 0.0),
                (0.2, 0.7),
                (0.2, 0.25),
                (-0.9, 0.25),
            ]])
        },
    },
    Shape {
        name: "crescent",
        def: "a curved crescent moon shape",
        frequency: Frequency::Common,
        outline: || Outline {
            solids: vec![ellipse(0.0, 0.0, 0.9, 0.9, 48)],
            holes: vec![ellipse(0.45, -0.1, 0.75, 0.8, 48)],
        },
    },
    Shape {
        name: "house",
        def: "a small house with a pointed roof",
        frequency: Frequency::Common,
        outline: || {
            solid(vec![vec![
                (-0.7, -0.05),
                (0.0, -0.9),
                (0.7, -0.05),
                (0.7, 0.85),
                (-0.7, 0.85),
            ]])
        },
    },
    Shape {
        name: "mushroom",
        def: "a mushroom with a domed cap on a short stem",
        frequency: Frequency::Common,
        outline: || {
            let n = 24;
            let cap: Polygon = (0..=n)
                .map(|i| {
                    let a = std::f64::consts::PI + i as f64 * std::f64::consts::PI / n as f64;
                    (0.9 * a.cos(), 0.1 + 0.8 * a.sin())
                })
                .collect();
            solid(vec![cap, rect(-0.25, 0.05, 0.25, 0.9)])
        },
    },
    Shape {
        name: "tree",
        def: "a pine tree with a triangular crown and a trunk",
        frequency: Frequency::Common,
        outline: || {
            solid(vec![
                vec![(0.0, -0.95), (0.75, 0.5), (-0.75, 0.5)],
                rect(-0.15, 0.45, 0.15, 0.95),
            ])
        },
    },
    Shape {
        name: "heart",
        def: "a heart shape with two rounded lobes",
        frequency: Frequency::Rare,
        outline: || {
            let n = 64;
            solid(vec![
                (0..n)
                    .map(|i| {
                        let t = i as f64 * std::f64::consts::TAU / n as f64;
                        let x = 16.0 * t.sin().powi(3);
                        let y = 13.0 * t.cos() - 5.0 * (2.0 * t).cos() - 2.0 * (3.0 * t).cos() - (4.0 * t).cos();
                        (x / 17.0, -y / 17.0 - 0.05)
                    })
                    .collect(),
            ])
        },
    },
    Shape {
        name: "lightning_bolt",
        def: "a zigzag lightning bolt",
        frequency: Frequency::Rare,
        outline: || {
            solid(vec![vec![
                (0.15, -0.95),
                (-0.55, 0.1),
                (-0.05, 0.1),
                (-0.3, 0.95),
                (0.55, -0.15),
                (0.05, -0.15),
                (0.35, -0.95),
            ]])
        },
    },
    Shape {
        name: "bell",
        def: "a bell that flares at the bottom",
        frequency: Frequency::Rare,
        outline: || {
            solid(vec![
                vec![
                    (-0.35, -0.7),
                    (0.35, -0.7),
                    (0.5, -0.2),
                    (0.6, 0.45),
                    (0.9, 0.7),
                    (-0.9, 0.7),
                    (-0.6, 0.45),
                    (-0.5, -0.2),
                ],
                ellipse(0.0, 0.8, 0.18, 0.15, 16),
            ])
        },
    },
    Shape {
        name: "fish",
        def: "a fish with an oval body and a forked tail",
        frequency: Frequency::Rare,
        outline: || {
            solid(vec![
                ellipse(-0.15, 0.0, 0.65, 0.4, 32),
                vec![(0.35, 0.0), (0.95, -0.45), (0.8, 0.0), (0.95, 0.45)],
            ])
        },
    },
    Shape {
        name: "cup",
        def: "a cup with a handle on one side",
        frequency: Frequency::Rare,
        outline: || Outline {
            solids: vec![rect(-0.75, -0.6, 0.35, 0.8), ellipse(0.5, 0.1, 0.38, 0.35, 24)],
            holes: vec![ellipse(0.56, 0.1, 0.16, 0.17, 16)],
        },
    },
    Shape {
        name: "key",
        def: "a key with a round bow and a toothed blade",
        frequency: Frequency::Rare,
        outline: || Outline {
            solids: vec![
                ellipse(-0.55, 0.0, 0.38, 0.38, 24),
                vec![
                    (-0.2, -0.1),
                    (0.95, -0.1),
                    (0.95, 0.1),
                    (0.8, 0.1),
                    (0.8, 0.35),
                    (0.65, 0.35),
                    (0.65, 0.1),
                    (0.5, 0.1),
                    (0.5, 0.28),
                    (0.35, 0.28),
                    (0.35, 0.1),
                    (-0.2, 0.1),
                ],
            ],
            holes: vec![ellipse(-0.55, 0.0, 0.15, 0.15, 16)],
        },
    },
];
