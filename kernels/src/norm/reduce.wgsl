// Workgroup-wide sum and max, shared by the norm kernels (appended to each of them).
// A tree over workgroup memory: portable to every adapter, whatever its subgroup size.
var<workgroup> red: array<f32, {{ wg_x }}>;

fn reduce_sum(value: f32, lid: u32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = {{ wg_x }}u / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // The next reduction reuses `red`: nobody may overwrite it before all have read the total.
    workgroupBarrier();
    return total;
}

fn reduce_max(value: f32, lid: u32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = {{ wg_x }}u / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}
