// Workgroup-wide sum and max through subgroup operations (the GPU variant of reduce.wgsl, same
// functions): one subgroupAdd/subgroupMax, then one partial per subgroup through workgroup
// memory, two barriers in all instead of one per level of a tree. Every invocation sums the
// partials itself (at most 256 / subgroup size of them), so no second subgroup pass is needed
// and any subgroup size works. The kernel's entry point passes its subgroup builtins to
// reduce_init first.
var<workgroup> red: array<f32, {{ wg_x }}>;
var<private> sg_lane: u32;
var<private> sg_id: u32;
var<private> sg_count: u32;

fn reduce_init(lane: u32, id: u32, count: u32) {
    sg_lane = lane;
    sg_id = id;
    sg_count = count;
}

fn reduce_sum(value: f32, lid: u32) -> f32 {
    let part = subgroupAdd(value);
    if (sg_lane == 0u) {
        red[sg_id] = part;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < sg_count; i++) {
        total += red[i];
    }
    // The next reduction reuses `red`: nobody may overwrite it before all have read it.
    workgroupBarrier();
    return total;
}

fn reduce_max(value: f32, lid: u32) -> f32 {
    let part = subgroupMax(value);
    if (sg_lane == 0u) {
        red[sg_id] = part;
    }
    workgroupBarrier();
    var total = -3.0e38;
    for (var i = 0u; i < sg_count; i++) {
        total = max(total, red[i]);
    }
    workgroupBarrier();
    return total;
}
