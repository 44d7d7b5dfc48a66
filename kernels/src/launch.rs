//! Plumbing shared by every launcher: a WGSL template becomes a cubecl kernel, small parameter
//! blocks travel as storage buffers, and grids larger than one dispatch dimension are folded.

use burn::backend::wgpu::{CubeTensor, KernelSource, SourceKernel, SourceTemplate};
use burn::cubecl::client::Client;
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::{BufferBinding, KernelArguments};
use burn::cubecl::{CubeCount, CubeDim};
use burn::tensor::{DType, Shape};

/// WebGPU guarantees 65,535 workgroups per dispatch dimension; grids past that fold into `y`.
pub(crate) const MAX_GROUPS_PER_DIM: u32 = 65_535;

type Generator = Box<dyn Fn() -> String + Send + Sync>;

/// One WGSL file plus the values that fill its `{{ name }}` placeholders.
///
/// Small values (`var`) form the kernel id, so each variant compiles once and is cached.
/// Generated code (`generated`: unrolled register tiles, kilobytes of text) is produced only when
/// the variant compiles, never per launch, and so must be a pure function of the name and vars.
pub(crate) struct WgslKernel {
    name: &'static str,
    /// Source files concatenated in order (a kernel plus shared helpers).
    parts: Vec<&'static str>,
    vars: Vec<(&'static str, String)>,
    generated: Vec<(&'static str, Generator)>,
}

impl std::fmt::Debug for WgslKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgslKernel")
            .field("name", &self.name)
            .field("vars", &self.vars)
            .finish_non_exhaustive()
    }
}

impl WgslKernel {
    pub(crate) fn new(name: &'static str, template: &'static str) -> Self {
        Self {
            name,
            parts: vec![template],
            vars: Vec::new(),
            generated: Vec::new(),
        }
    }

    /// Appends a shared WGSL file (helpers several kernels use).
    pub(crate) fn with_part(mut self, part: &'static str) -> Self {
        self.parts.push(part);
        self
    }

    pub(crate) fn var(mut self, key: &'static str, value: impl ToString) -> Self {
        self.vars.push((key, value.to_string()));
        self
    }

    /// A placeholder filled by `generate` when (and only when) the variant is compiled.
    pub(crate) fn generated(
        mut self,
        key: &'static str,
        generate: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        self.generated.push((key, Box::new(generate)));
        self
    }

    /// Fills the template and sets the workgroup size, then queues it on the client.
    pub(crate) fn launch(
        self,
        client: &Client,
        workgroup: (u32, u32, u32),
        groups: (u32, u32, u32),
        buffers: Vec<BufferBinding>,
    ) {
        let kernel = self
            .var("wg_x", workgroup.0)
            .var("wg_y", workgroup.1)
            .var("wg_z", workgroup.2);
        let cube_dim = CubeDim::new_3d(workgroup.0, workgroup.1, workgroup.2);
        client.launch(
            Box::new(SourceKernel::new(kernel, cube_dim)),
            CubeCount::Static(groups.0, groups.1, groups.2),
            KernelArguments::new().with_buffers(buffers),
        );
    }
}

impl KernelSource for WgslKernel {
    fn source(&self) -> SourceTemplate {
        let template = SourceTemplate::new(self.parts.concat());
        let template = self
            .generated
            .iter()
            .fold(template, |t, (k, generate)| t.register(*k, generate()));
        self.vars.iter().fold(template, |t, (k, v)| t.register(*k, v.clone()))
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, self.vars.clone()))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Uploads a parameter block (all fields 32-bit) as a read-only storage buffer.
pub(crate) fn params(client: &Client, words: &[u32]) -> BufferBinding {
    client.create_from_slice(bytemuck::cast_slice(words)).binding()
}

/// Allocates an uninitialised contiguous output on the same device as `like`.
pub(crate) fn empty_like_device(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    let bytes = shape.num_elements() * dtype.size();
    let handle = like.client.empty(bytes.max(4));
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
}

/// Splits `groups` workgroups over x and y so neither exceeds the per-dimension limit.
/// Shaders rebuild the linear index as `id.x + id.y * num_workgroups.x`.
pub(crate) fn fold_groups(groups: u32) -> (u32, u32) {
    if groups <= MAX_GROUPS_PER_DIM {
        (groups.max(1), 1)
    } else {
        let y = groups.div_ceil(MAX_GROUPS_PER_DIM);
        (groups.div_ceil(y), y)
    }
}

pub(crate) fn binding(t: &CubeTensor) -> BufferBinding {
    t.handle.clone().binding()
}

pub(crate) fn dims(t: &CubeTensor) -> Vec<usize> {
    t.meta.shape().iter().copied().collect()
}

pub(crate) fn as_u32(x: usize, what: &str) -> u32 {
    u32::try_from(x).unwrap_or_else(|_| panic!("{what} = {x} does not fit the kernels' 32-bit indexing"))
}
